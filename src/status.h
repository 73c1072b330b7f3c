// Status helpers. This abseil (20220623) ships absl::Status/StatusOr but no
// RETURN_IF_ERROR-style macros; these are ours.
#ifndef KVC_SRC_STATUS_H_
#define KVC_SRC_STATUS_H_

#include "absl/status/status.h"
#include "absl/status/statusor.h"

// Returns from the current function if `expr` (an absl::Status) is not OK.
#define KVC_RETURN_IF_ERROR(expr)                  \
  do {                                             \
    ::absl::Status kvc_status_ = (expr);           \
    if (!kvc_status_.ok()) return kvc_status_;     \
  } while (0)

#define KVC_STATUS_CONCAT_INNER_(a, b) a##b
#define KVC_STATUS_CONCAT_(a, b) KVC_STATUS_CONCAT_INNER_(a, b)

// `lhs` = the value of `rexpr` (an absl::StatusOr<T>), or returns its status.
#define KVC_ASSIGN_OR_RETURN(lhs, rexpr) \
  KVC_ASSIGN_OR_RETURN_IMPL_(KVC_STATUS_CONCAT_(kvc_statusor_, __LINE__), lhs, rexpr)
#define KVC_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, rexpr) \
  auto tmp = (rexpr);                               \
  if (!tmp.ok()) return tmp.status();               \
  lhs = std::move(tmp).value()

#endif  // KVC_SRC_STATUS_H_
