"""Small shared pieces every part of TwinFlow uses: errors, progress/interrupt, model paths, logging."""
