//! (integration under construction)
