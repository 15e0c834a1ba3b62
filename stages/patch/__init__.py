"""The math of the patch methods, as pure functions on arrays, apart from the families.

Several families and the anomaly maps share it: the coreset serves PatchCore and the
patch-bank kNN, the maps serve every family that scores patches, and the head-to-head
benchmark calls it directly. ``stages.methods`` keeps one module per family; those modules
import from here.

- :mod:`stages.patch.patchcore`: greedy k-center coreset order on a random projection,
  chunked nearest-neighbour patch scores, image score and the paper's reweighting;
- :mod:`stages.patch.padim`: per-position Gaussians on a random channel subset and their
  Mahalanobis distances;
- :mod:`stages.patch.maps`: patch-score grid to an anomaly map (bilinear, Gaussian blur).
"""
