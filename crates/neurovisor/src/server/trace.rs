//! Trace ids on the gRPC edge: `x-trace-id` request metadata is honoured,
//! otherwise a UUIDv7 is minted; either way it is returned in the response
//! metadata and travels to the guest as `NEUROVISOR_TRACE_ID`.

use tonic::metadata::MetadataValue;
use tonic::{Request, Response};

pub const TRACE_HEADER: &str = "x-trace-id";
const MAX_TRACE_ID_LEN: usize = 128;

pub fn trace_id_of<T>(req: &Request<T>) -> String {
    req.metadata()
        .get(TRACE_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty() && v.len() <= MAX_TRACE_ID_LEN && v.chars().all(|c| c.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string())
}

pub fn with_trace_id<T>(mut resp: Response<T>, trace_id: &str) -> Response<T> {
    if let Ok(v) = MetadataValue::try_from(trace_id) {
        resp.metadata_mut().insert(TRACE_HEADER, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn honours_valid_ids_and_mints_otherwise() {
        let mut r = Request::new(());
        r.metadata_mut()
            .insert(TRACE_HEADER, "my-trace-123".parse().expect("ascii"));
        assert_eq!(trace_id_of(&r), "my-trace-123");
        let minted = trace_id_of(&Request::new(()));
        assert_eq!(uuid::Uuid::parse_str(&minted).expect("uuid").get_version_num(), 7);
        let mut bad = Request::new(());
        bad.metadata_mut()
            .insert(TRACE_HEADER, "a b".parse().expect("ascii"));
        assert_ne!(trace_id_of(&bad), "a b");
    }
}
