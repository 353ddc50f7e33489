//! The backends' wire format in one place, below everything that speaks it:
//! the frame codec that the proxy and durable intake decode with, and the
//! client that `pushbridge send`, the benchmark and the tests send with.

pub mod client;
pub mod frame;
