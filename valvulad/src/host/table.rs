//! The table of host services every module gets: one static, so it outlives every
//! module. Its entries are the request and reply services (`api`) and the storage
//! services (`storage`).

use valvula_abi::{self as abi, vlv_host_api};

use super::api::*;
use super::storage::*;

/// The table every module gets. Static: it outlives every module.
pub(super) static HOST_API: vlv_host_api = table(abi::VLV_ABI_MAJOR, abi::VLV_ABI_MINOR);

/// The same table for a module built for ABI 0.x: it says 0.5 (the layout 1.0 froze),
/// so a module that checks the host's major against its own still starts.
pub(super) static HOST_API_LEGACY: vlv_host_api = table(0, abi::VLV_ABI_LEGACY_MINOR);

const fn table(abi_major: u16, abi_minor: u16) -> vlv_host_api {
    vlv_host_api {
        struct_size: std::mem::size_of::<vlv_host_api>() as u32,
        abi_major,
        abi_minor,
        log: Some(host_log),
        config_get: Some(host_config_get),
        request_get: Some(host_request_get),
        request_attr: Some(host_request_attr),
        reply_set: Some(host_reply_set),
        now: Some(host_now),
        sql_dialect: Some(host_sql_dialect),
        sql_exec: Some(host_sql_exec),
        sql_batch: Some(host_sql_batch),
        sql_query: Some(host_sql_query),
        rows_count: Some(host_rows_count),
        rows_columns: Some(host_rows_columns),
        rows_get: Some(host_rows_get),
        rows_column_name: Some(host_rows_column_name),
        rows_free: Some(host_rows_free),
        consume: Some(host_consume),
        peek: Some(host_peek),
        reset: Some(host_reset),
        consume_once: Some(host_consume_once),
        sql_exec_once: Some(host_sql_exec_once),
        consume_all: Some(host_consume_all),
        time_zone: Some(host_time_zone),
        consume_async: Some(host_consume_async),
        sql_query_async: Some(host_sql_query_async),
        sql_exec_async: Some(host_sql_exec_async),
        log_level: Some(host_log_level),
    }
}
