//! Conversion of non-streaming Chat Completions and Responses calls.

pub mod chat;
pub mod outcome;
pub mod request;
pub mod responses;
