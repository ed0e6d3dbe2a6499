//! The shared-memory segment ([`segment`]), what lives where in it ([`layout`]), how a
//! new one is initialised ([`init`]), and how large archives are copied into it ([`copy`]).

pub(crate) mod copy;
pub(crate) mod init;
pub(crate) mod layout;
pub(crate) mod segment;
