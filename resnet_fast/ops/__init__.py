"""Fused ops. Fronts with the modules' semantics (conv_bn, bn_act, add_relu, scale_bias_act, pool),
the routing table (dispatch), and one place per backend: triton/, ext, onednn, reference."""
