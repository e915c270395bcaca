//! Decoder-only GPT (being written).
