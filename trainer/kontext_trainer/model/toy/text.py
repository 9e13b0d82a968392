"""The toy base's text encoders: real CLIP and T5 classes and tokenizers, with a CLIP that tells instructions apart.

A random one-layer CLIP maps unrelated captions to pooled vectors with cosine similarity up to 0.94 (measured:
"brighten the image" vs "RMV, remove the blue square" 0.91), because the pooled EOS state is dominated by what
every caption shares. The toy base recognises its instructions from the pooled vector, so its CLIP is set to a
bag of words instead: no position embeddings, uniform causal attention that averages the layer-normed token
embeddings, no MLP, and zero embeddings for the BOS/EOS/pad tokens. The pooled vector is then the normalised mean
of the caption's word vectors, and two captions are similar only as far as they share words. It stays a causal
CLIP, so the pooled vector does not depend on padding, as with the real one. T5 is left random: the toy base does
not read it (a LoRA may).
"""

from __future__ import annotations

import torch
from transformers import CLIPTextModel, CLIPTokenizer

WORD_SCALE = 1.0


@torch.no_grad()
def make_bag_of_words_clip(clip: CLIPTextModel, tokenizer: CLIPTokenizer, seed: int) -> None:
    model = getattr(clip, "text_model", clip)  # transformers 5 flattened CLIPTextModel
    generator = torch.Generator().manual_seed(seed)
    embeddings = model.embeddings
    words = torch.randn(embeddings.token_embedding.weight.shape, generator=generator) * WORD_SCALE
    for token_id in {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}:
        if token_id is not None:
            words[token_id] = 0
    embeddings.token_embedding.weight.copy_(words)
    embeddings.position_embedding.weight.zero_()
    hidden = words.shape[1]
    for layer in model.encoder.layers:
        attention = layer.self_attn
        for projection in (attention.q_proj, attention.k_proj):  # zero queries and keys: uniform causal attention
            projection.weight.zero_()
            projection.bias.zero_()
        attention.v_proj.weight.copy_(torch.eye(hidden))
        attention.v_proj.bias.zero_()
        attention.out_proj.weight.copy_(torch.eye(hidden))
        attention.out_proj.bias.zero_()
        layer.mlp.fc2.weight.zero_()
        layer.mlp.fc2.bias.zero_()
        for norm in (layer.layer_norm1, layer.layer_norm2):
            norm.weight.fill_(1.0)
            norm.bias.zero_()
    model.final_layer_norm.weight.fill_(1.0)
    model.final_layer_norm.bias.zero_()
