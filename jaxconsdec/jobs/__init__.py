"""The file-to-file commands: `decode` (latent files -> images) and `encode` (image files ->
latent files), on one engine (`engine.run_job`): every device of every process, resumable,
atomic, bad inputs listed."""
