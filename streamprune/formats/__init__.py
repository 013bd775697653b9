"""Export formats: other runtimes' model files written from a pruned folder, streamed."""
