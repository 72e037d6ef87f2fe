//! Pure body rewrites: bytes in, bytes out, no I/O.
//!
//! - [`start`]: kernel-start bodies, parsed strictly and re-serialized from the decision;
//! - [`kernelspecs`]: kernelspec documents, with `spec.metadata.client_envs` injected.

pub mod kernelspecs;
pub mod start;
