//! Conversion of non-streaming Chat Completions and Responses calls.

pub mod outcome;
pub mod request;
