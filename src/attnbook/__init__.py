"""attnbook: the tested modules behind the book "Attention, from a buggy sketch to a trainable GPT".

Each chapter in ``chapters/`` builds an idea step by step and ends in one of these modules:

- ``attnbook.attention.single_head`` — the fixed single-head attention of chapter 01;
- ``attnbook.attention.core`` and ``attnbook.attention.masks`` — scaled dot-product attention and
  its masks (chapter 02);
- ``attnbook.attention.mha`` — batched multi-head causal self-attention (chapter 03);
- ``attnbook.attention`` — the registry that builds any variant by name.
"""

__version__ = "0.1.0"
