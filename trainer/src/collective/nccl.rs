//! TODO nccl
