"""The benches' model shapes, without torch: bench.scale runs the planning code alone, the others build tensors
of these shapes (bench.compare.local_state)."""
from __future__ import annotations


def gpt_shapes(params: float, vocab: int = 50304) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of a GPT-style decoder with about `params` parameters (d_model from a 24-layer
    depth-to-width rule, scaled)."""
    layers = 24 if params >= 200e6 else 12 if params >= 40e6 else 4
    d = 64
    while True:
        n = vocab * (d + 64) + layers * (12 * (d + 64) ** 2)
        if n > params:
            break
        d += 64
    shapes = {"tok_emb.weight": (vocab, d), "pos_emb.weight": (2048, d), "ln_f.weight": (d,), "ln_f.bias": (d,)}
    for i in range(layers):
        p = f"blocks.{i}."
        shapes.update({p + "ln1.weight": (d,), p + "ln1.bias": (d,), p + "attn.qkv.weight": (3 * d, d),
                       p + "attn.qkv.bias": (3 * d,), p + "attn.proj.weight": (d, d), p + "attn.proj.bias": (d,),
                       p + "ln2.weight": (d,), p + "ln2.bias": (d,), p + "mlp.fc.weight": (4 * d, d),
                       p + "mlp.fc.bias": (4 * d,), p + "mlp.proj.weight": (d, 4 * d), p + "mlp.proj.bias": (d,)})
    return shapes
