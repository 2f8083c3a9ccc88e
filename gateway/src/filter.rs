//! The CIDR filter at accept: a source outside the allow-list is dropped before a single
//! TLS byte is exchanged, counted, and written to the audit log.

use std::{net::SocketAddr, sync::Arc};

use async_trait::async_trait;
use pingora::listeners::ConnectionFilter;
use taskgate_shared::cidr::CidrList;

use crate::{
    audit::{self, Reason},
    metrics::Metrics,
};

/// pingora's [`ConnectionFilter`] over a [`CidrList`]. An empty list allows everyone.
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
}

#[async_trait]
impl ConnectionFilter for CidrFilter {
    async fn should_accept(&self, addr: Option<&SocketAddr>) -> bool {
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
            // No address is a Unix-socket listener: local by construction.
            _ => true,
        }
    }
}
