"""Webdataset shards of sparse FLUX feature volumes: the one input of training."""
