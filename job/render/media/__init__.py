"""Every byte from outside the process: audio decoding and WAV files, FFmpeg and ffprobe, downloads."""
