"""Reusable parts of the zoo's models, each written once: the feature extractor and its cache, the
coreset, flow blocks, PCA, nearest-neighbour search, map filters, input normalisation, frozen modules."""
