//! The CIDR filter at accept: a source outside the allow-list is dropped before a single
//! TLS byte is exchanged, counted, and written to the audit log.

use std::{net::SocketAddr, sync::Arc};

use taskgate_shared::cidr::CidrList;

use crate::{
    audit::{self, Reason},
    metrics::Metrics,
};

/// The allow-list, checked once per accepted connection. An empty list allows everyone.
#[derive(Debug)]
pub struct CidrFilter {
    list: CidrList,
    metrics: Arc<Metrics>,
}

impl CidrFilter {
    /// Builds the filter.
    pub fn new(list: CidrList, metrics: Arc<Metrics>) -> Self {
        CidrFilter { list, metrics }
    }

    /// True when a connection from `addr` may proceed; a refusal is counted and audited.
    /// No address is a Unix-socket listener: local by construction.
    pub fn should_accept(&self, addr: Option<&SocketAddr>) -> bool {
        match addr {
            Some(a) if !self.list.allows(a.ip()) => {
                self.metrics.deny(Reason::Cidr);
                audit::denied_connection(
                    &a.to_string(),
                    Reason::Cidr,
                    "source outside --allow-cidr",
                );
                false
            }
            _ => true,
        }
    }
}
