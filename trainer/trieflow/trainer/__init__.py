"""Trie-packed RL trainer."""
