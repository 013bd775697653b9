"""Storage and transfer: the source checkpoint reader, the output writer, the on-disk
activation cache, the weight prefetcher, and atomic file writes."""
