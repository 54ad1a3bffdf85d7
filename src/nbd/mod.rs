//! The NBD protocol, shared by the `nbd` client driver
//! (src/drivers/nbd) and a server to come: the wire format only.

pub mod proto;
