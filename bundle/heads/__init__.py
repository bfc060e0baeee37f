"""Few-shot heads on a diffusion-pre-trained UNet: landmark heatmaps and multi-label segmentation.

After Di Via et al. (arXiv 2407.18125): the denoising UNet, pre-trained without labels, is fine-tuned as
a dense regressor. Its time embedding is switched off (every call uses timestep 0, so the embedding is a
constant the fine-tuning can absorb) and its output convolution is replaced by a new 1x1 convolution with
one channel per landmark (Gaussian heatmaps) or per structure (mask logits).

Coordinates follow MONAI's array order: an image array is ``(C, X, Y)`` with X to the right and Y down,
and a landmark is ``(x, y)`` in pixels of that array, the same convention as the JSRT landmark files.

- :mod:`.networks`: the head networks, building them on a pre-trained denoiser, saving and loading them;
- :mod:`.encoders`: other pre-trained encoders (the bundle's DINO ViT, a supervised timm backbone from a local
  file) with a light decoder, the initialisations the denoiser is compared with;
- :mod:`.frame`: the geometry between an original image and its preprocessed square;
- :mod:`.landmarks`: landmark files, Gaussian heatmaps and their decoding, the heatmap loss, MRE/SDR;
- :mod:`.segmentation`: mask files on disk and Dice/Hausdorff scores;
- :mod:`.training`: labelled datalists into dataset items, and fine-tuning for a fixed number of steps;
- :mod:`.inference`: a trained head on a folder, outputs in each image's original frame, scores.
"""

# configs name bundle.heads.<module>.<name> after a plain `import bundle`
from . import encoders, frame, inference, landmarks, networks, segmentation, training  # noqa: F401
