//! slotfix: Slot Attention object discovery with implicit differentiation.
//!
//! The CPU implementation of every op ([`ops`]) is the reference; the model ([`model`]) is
//! written once over the [`backend::Backend`] trait.

pub mod backend;
pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod cpu;
pub mod cuda;
pub mod data;
pub mod device;
pub mod dump;
pub mod eval;
pub mod metrics;
pub mod model;
pub mod ops;
pub mod optim;
pub mod real;
pub mod render;
pub mod rng;
pub mod train;
