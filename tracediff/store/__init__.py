"""Trace files: the HDF5 writer and reader (and imports from other formats)."""
