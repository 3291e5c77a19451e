//! The user's service made ready to serve once, not per request: an axum `Router` turns its
//! handlers into routes with its state (`Router::with_state(())`), a tonic `Routes` likewise
//! (`Routes::prepare`), as `axum::serve` and tonic's `Server` do before they serve.
//!
//! Without it axum converts every handler again on each request: an allocation and a boxed
//! clone per request.

/// `service`, prepared if it is an axum `Router` or a tonic `Routes` (other services as given).
pub(super) fn prepared<S: 'static>(service: S) -> S {
    #[cfg_attr(not(any(feature = "axum", feature = "tonic")), allow(unused_mut))]
    let mut slot = Some(service);
    #[cfg(feature = "axum")]
    if let Some(router) =
        (&mut slot as &mut dyn std::any::Any).downcast_mut::<Option<::axum::Router>>()
    {
        *router = router.take().map(|router| router.with_state(()));
    }
    #[cfg(feature = "tonic")]
    if let Some(routes) =
        (&mut slot as &mut dyn std::any::Any).downcast_mut::<Option<::tonic::service::Routes>>()
    {
        *routes = routes.take().map(::tonic::service::Routes::prepare);
    }
    slot.expect("put back above")
}

#[cfg(all(test, feature = "axum"))]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_prepared_router_answers_as_before() {
        use tower::ServiceExt;
        let router = ::axum::Router::new().route("/", ::axum::routing::get(|| async { "hi" }));
        let router = prepared(router);
        let response = router
            .oneshot(http::Request::new(::axum::body::Body::empty()))
            .await
            .unwrap();
        assert_eq!(response.status(), http::StatusCode::OK);
    }

    #[test]
    fn other_services_pass_through() {
        assert_eq!(prepared(7_u8), 7);
    }
}
