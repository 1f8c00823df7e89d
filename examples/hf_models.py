"""Models nobody here wrote, for plait train: a transformers Llama and a vision transformer.

Both start from random weights (a config, nothing downloaded). A transformers model returns an
output object; plait's loss takes a tensor, so each wrapper's forward returns the logits.
"""
from transformers import LlamaConfig, LlamaForCausalLM, ViTConfig, ViTForImageClassification


class Llama(LlamaForCausalLM):
    def forward(self, input_ids):
        return super().forward(input_ids=input_ids).logits  # [batch, time, vocab]


def llama(vocab_size: int, block_size: int, dim: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2):
    """vocab_size and block_size come from the dataset (plait fills them in)."""
    return Llama(LlamaConfig(vocab_size=vocab_size, max_position_embeddings=block_size, hidden_size=dim,
                             intermediate_size=4 * dim, num_hidden_layers=layers, num_attention_heads=heads,
                             num_key_value_heads=kv_heads))


class ViT(ViTForImageClassification):
    def forward(self, pixel_values):
        return super().forward(pixel_values=pixel_values).logits  # [batch, classes]


def vit(num_classes: int, size: int = 8, patch: int = 2, dim: int = 64, layers: int = 4, heads: int = 4):
    """A vision transformer for one-channel size x size images (the digits: plait fills num_classes)."""
    return ViT(ViTConfig(image_size=size, patch_size=patch, num_channels=1, hidden_size=dim, num_hidden_layers=layers,
                         num_attention_heads=heads, intermediate_size=4 * dim, num_labels=num_classes))
