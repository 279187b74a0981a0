"""The user's input files, as the jobs and the trainer read them: listing folders, refusing
what is not a regular file or would escape its output folder, and reading images."""
