"""minbpe: a byte-level BPE tokenizer written for the book (chapter 12).

The tokenizers themselves arrive with chapter 12; until then the package is importable and empty.
"""
