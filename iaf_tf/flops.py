"""Analytic FLOP counts of the weight-normed convolutions (a multiply-add counts as two FLOPs)."""


def conv_forward_flops(layer):
    """Forward FLOPs per image of a built WNConv2D.

    Dense: taps a mask zeroes are counted, as the convolution computes them. A conv does kh*kw*in*out
    multiply-adds per output position; a transposed conv as many per input position.
    """
    if layer.input_grid is None or None in layer.input_grid:
        raise ValueError(f"{layer.name}: build the layer on a known spatial shape first")
    height, width = layer.input_grid
    if not layer.transpose:
        _, height, width, _ = layer.compute_output_shape((1, height, width, None))
    kh, kw, c1, c2 = layer.V.shape  # [kh, kw, in, out], or [kh, kw, out, in] when transposed
    return 2 * kh * kw * c1 * c2 * height * width


def forward_flops_per_image(model):
    """Forward FLOPs per image of every conv in `model.named_convs()` (each runs once per forward pass)."""
    return sum(conv_forward_flops(conv) for conv in model.named_convs().values())


def training_flops_per_image(model):
    """Forward, input-gradient and filter-gradient convolutions: three times the forward count."""
    return 3 * forward_flops_per_image(model)
