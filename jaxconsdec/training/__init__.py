"""Consistency training: the pair law and curriculum, the loss, the data, the step and the loop."""
