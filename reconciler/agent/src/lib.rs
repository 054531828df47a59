//! palisade's node agent.
pub mod datapath;
