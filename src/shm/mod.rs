//! The shared-memory segment ([`segment`]) and what lives where in it ([`layout`]).

pub(crate) mod layout;
pub(crate) mod segment;
