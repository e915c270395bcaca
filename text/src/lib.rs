//! kiln-text: language-model data without libtorch (being written).
