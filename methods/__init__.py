"""Control methods, one file each; importing registers them in METHODS."""
from bench.methods import baseline, controlnet, controlnet_pp, controlnext, finetune, frozen, odgen, t2i_adapter  # noqa: F401
from bench.methods import instantid, ip_adapter, photomaker  # noqa: F401
