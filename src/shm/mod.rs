//! The shared-memory segment ([`segment`]), what lives where in it ([`layout`]), and how a
//! new one is initialised ([`init`]).

pub(crate) mod init;
pub(crate) mod layout;
pub(crate) mod segment;
