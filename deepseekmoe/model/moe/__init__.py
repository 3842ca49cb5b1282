"""The DeepSeekMoE layer: routers and balance losses (router.py), the slot dispatch every expert
backend and expert parallel share (dispatch.py), the routed-expert backends (experts.py) and
the layer that combines shared and routed experts (layer.py)."""
