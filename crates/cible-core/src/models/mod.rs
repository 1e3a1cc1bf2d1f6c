//! Models over per-profile feature vectors (see [`crate::features`]): clustering today.

pub mod kmeans;
