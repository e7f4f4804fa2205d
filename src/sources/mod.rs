//! Sources turn input into messages for the store. Today: the embedded broker's subscription on
//! the forward filters (`local`). Hardware sources (GPIO, serial) join here.

pub mod local;
