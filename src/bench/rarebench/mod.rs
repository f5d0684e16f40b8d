//! RareBench, the R2F paper's benchmark, run against r2f with an LLM judge (issue 23): the
//! benchmark folder in the official layout ([`dataset`]), the configurations compared and the
//! generation boundary ([`spec`]), the judge ([`judge`]), the run state that makes a run
//! resumable ([`manifest`]), the official aggregate, paired bootstrap differences and the
//! compare gate ([`score`]), and the reports ([`report`]).

pub mod dataset;
pub mod judge;
pub mod manifest;
pub mod report;
pub mod score;
pub mod spec;
