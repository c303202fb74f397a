"""IP-Adapter in the SALT call: the image conditions sampling, not the reference or its inversion.

A UNet with an IP-Adapter loaded (``encoder_hid_dim_type="ip_image_proj"``) refuses a call without
``image_embeds``, and object generation and DDIM inversion call it with text alone. Around them
:func:`ip_adapter_off` takes the adapter out as diffusers' ``unload_ip_adapter`` does (no image
projection, plain attention where the decoupled image attention was) and puts the same modules back.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from diffusers.models.attention_processor import AttnProcessor2_0


@contextmanager
def ip_adapter_off(unet) -> Iterator[None]:
    """Inside the block ``unet`` runs as without its IP-Adapter (a no-op when none is loaded); its
    image projection and attention processors are restored afterwards, also when the body raises."""
    projection = unet.encoder_hid_proj
    if projection is None or unet.config.encoder_hid_dim_type != "ip_image_proj":
        yield
        return
    original = dict(unet.attn_processors)
    plain = {name: AttnProcessor2_0() if hasattr(p, "to_k_ip") else p for name, p in original.items()}
    unet.encoder_hid_proj = None
    unet.set_attn_processor(plain)  # set_attn_processor pops from the dict it gets: hand it copies
    try:
        yield
    finally:
        unet.encoder_hid_proj = projection
        unet.set_attn_processor(dict(original))


__all__ = ["ip_adapter_off"]
