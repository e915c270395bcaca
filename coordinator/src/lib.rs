//! TODO coordinator
