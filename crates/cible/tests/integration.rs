//! End-to-end tests of the `cible` binary: one test binary, a module per feature.

mod integration {
    mod analysis;
    mod beside;
    mod cli;
    mod clients;
    pub mod common;
    mod concurrency;
    mod consent;
    mod crash;
    mod exports;
    mod http;
    mod keys;
    mod limits;
    mod openapi;
    mod segments;
    mod shutdown;
    mod webhooks;
}
