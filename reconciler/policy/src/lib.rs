//! palisade policy model (placeholder).
