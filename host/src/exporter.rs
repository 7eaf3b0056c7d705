//! The Prometheus exporter: an adapter over the [front](crate::front), like the gRPC API.
//! [`render`] writes one [`Front::observe`](crate::front::Front::observe) as metric families
//! (the classic text format, or OpenMetrics); [`serve`] is the HTTP endpoint on
//! `[host] metrics` (`/metrics`, `/healthz`, `/readyz`), started and stopped by the daemon.

pub mod render;
pub mod serve;
