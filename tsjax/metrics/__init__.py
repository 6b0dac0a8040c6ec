"""tsjax.metrics: evaluation metrics (and the stage-2 contextual loss).

Modules (import them directly; this package imports nothing heavy on its own):

- ``vgg``: Flax VGG16/VGG19 in torchvision's weight layout; ``contextual_loss`` /
  ``contextual_similarity`` (Mechrez et al. 2018), jittable and differentiable.
- ``lpips``: LPIPS-VGG (``lpips`` package formula and weights).
- ``clip``: CLIP vision + text towers from a transformers ``CLIPModel`` folder; ``clip_score``.
- ``aesthetic``: LAION aesthetic heads on CLIP ViT-L/14 image embeddings.
- ``geometric``: voxel IoU, chamfer distance, diversity, novelty, Lab palette distance (weight-free).
- ``result``: ``MetricResult`` (a number, or "not computed: weights missing at PATH").

``python -m tsjax.evaluate`` runs them all over result folders and writes metrics.json + report.html.
"""
