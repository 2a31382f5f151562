//! slotfix: Slot Attention object discovery with implicit differentiation.
//!
//! The CPU implementation of every op ([`ops`]) is the reference; the model ([`model`]) is
//! written once over the [`backend::Backend`] trait.

pub mod config;
pub mod ops;
pub mod real;
pub mod rng;
