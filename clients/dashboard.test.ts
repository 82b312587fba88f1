// Tests of the dashboard helpers, on Node's own runner: `npm test` in clients/.
import assert from "node:assert/strict";
import { describe, it } from "node:test";

import {
  formatChangePct,
  formatValue,
  isPlatformMetricName,
  isUserMetricName,
  nextMidnight,
  NO_VALUE,
  platformMetricRpc,
  rollupMaxAgeSeconds,
  toNumber,
  trendArrow,
  userKpisRpc,
  userMetricRpc,
} from "./dashboard.js";
import { KPIS, TRENDS, USER_METRICS, type KpiRow, type MetricRow } from "./metrics.js";

const USER = "c85cd714-7bf6-4552-8cbc-90446bcd5ce7";

describe("RPC arguments", () => {
  it("names the function, its schema and only the arguments given", () => {
    const call = userMetricRpc(USER, "total_earnings");
    assert.deepEqual(call, { schema: "public", fn: "user_metric", args: { p_user_id: USER, p_metric: "total_earnings" } });
    assert.ok(!("p_date" in call.args) && !("p_compare" in call.args));
  });

  it("passes a date and a comparison through", () => {
    assert.deepEqual(userMetricRpc(USER, "caas_score", { date: "2026-03-31", compare: "month" }).args, {
      p_user_id: USER,
      p_metric: "caas_score",
      p_date: "2026-03-31",
      p_compare: "month",
    });
    assert.deepEqual(platformMetricRpc("gross_revenue", { compare: "week" }), {
      schema: "public",
      fn: "platform_metric",
      args: { p_metric: "gross_revenue", p_compare: "week" },
    });
    assert.deepEqual(userKpisRpc(USER, { date: "2024-02-29" }).args, { p_user_id: USER, p_date: "2024-02-29" });
  });

  for (const bad of ["2026-02-30", "2025-02-29", "2026-2-3", "yesterday", "2026-03-31T00:00:00Z", ""]) {
    it(`refuses the date ${JSON.stringify(bad)}`, () => {
      assert.throws(() => userKpisRpc(USER, { date: bad }), RangeError);
    });
  }

  it("rejects a metric name the catalog does not have, at compile time", () => {
    // Each line below must fail to type-check: tsc reports an unused @ts-expect-error otherwise.
    // @ts-expect-error not a metric
    assert.throws(() => userMetricRpc(USER, "total_earning", { date: "x" }));
    // @ts-expect-error a platform metric is not a user metric
    assert.throws(() => userMetricRpc(USER, "gross_revenue", { date: "x" }));
    // @ts-expect-error not a comparison
    assert.throws(() => platformMetricRpc("new_users", { compare: "year", date: "x" }));
  });

  it("narrows strings to metric names", () => {
    assert.equal(isUserMetricName("total_earnings"), true);
    assert.equal(isUserMetricName("gross_revenue"), false);
    assert.equal(isPlatformMetricName("gross_revenue"), true);
    assert.equal(isPlatformMetricName("total_earnings"), false);
  });
});

describe("values by unit", () => {
  it("formats each unit", () => {
    assert.equal(formatValue(23, "count"), "23");
    assert.equal(formatValue("1045.44", "money"), "1,045.44");
    assert.equal(formatValue("1045.4", "money", { currency: "EUR" }), "€1,045.40");
    assert.equal(formatValue("12.5", "hours"), "12.50 h");
    assert.equal(formatValue(3.9, "rating"), "3.90");
    assert.equal(formatValue("86.08", "score"), "86.08");
    assert.equal(formatValue(75, "percent"), "75.00%");
    assert.equal(formatValue("1045.44", "money", { locale: "de-DE" }), "1.045,44");
  });

  it("shows NULL as no value and signs changes", () => {
    assert.equal(formatValue(null, "rating"), NO_VALUE);
    assert.equal(formatValue("197.06", "money", { signed: true }), "+197.06");
    assert.equal(formatValue(-2, "count", { signed: true }), "-2");
    assert.equal(formatValue(0, "count", { signed: true }), "0");
    assert.equal(formatChangePct("23.23"), "+23.23%");
    assert.equal(formatChangePct(-100), "-100.00%");
    assert.equal(formatChangePct(null), NO_VALUE);
  });

  it("reads node-postgres strings and refuses what is not a number", () => {
    assert.equal(toNumber("-12.50"), -12.5);
    assert.equal(toNumber(null), null);
    for (const bad of ["", "abc", "NaN", "Infinity"]) assert.throws(() => toNumber(bad), TypeError);
  });

  it("formats every metric of a row as the wire delivers it", () => {
    const pg: MetricRow<"node-postgres"> = { value: "4.25", previous_value: null, change: null, change_pct: null, trend: "neutral" };
    const rest: KpiRow = { metric: "average_rating", value: 4.25, previous_value: 4, change: 0.25, change_pct: 6.25, trend: "up" };
    assert.equal(formatValue(pg.value, USER_METRICS.average_rating.unit), formatValue(rest.value, USER_METRICS[rest.metric].unit));
    assert.equal(formatValue(pg.previous_value, USER_METRICS.average_rating.unit), NO_VALUE);
  });

  it("has the CLI's trend marks", () => {
    assert.deepEqual(TRENDS.map(trendArrow), ["▲", "▼", "•"]);
  });

  it("keeps every KPI in the metric list", () => {
    for (const metrics of Object.values(KPIS)) for (const m of metrics) assert.ok(m in USER_METRICS, m);
  });
});

describe("cache lifetime", () => {
  const at = (iso: string) => new Date(iso);

  it("finds the next midnight on ordinary and daylight-saving days", () => {
    assert.equal(nextMidnight(at("2026-03-31T13:45:10Z"), "UTC").toISOString(), "2026-04-01T00:00:00.000Z");
    assert.equal(nextMidnight(at("2026-04-01T00:00:00Z"), "UTC").toISOString(), "2026-04-02T00:00:00.000Z");
    // New York springs forward on 2026-03-08 (a 23-hour day) and falls back on 2026-11-01 (25 hours).
    assert.equal(nextMidnight(at("2026-03-08T06:00:00Z"), "America/New_York").toISOString(), "2026-03-09T04:00:00.000Z");
    assert.equal(nextMidnight(at("2026-03-08T03:00:00Z"), "America/New_York").toISOString(), "2026-03-08T05:00:00.000Z");
    assert.equal(nextMidnight(at("2026-11-01T05:00:00Z"), "America/New_York").toISOString(), "2026-11-02T05:00:00.000Z");
  });

  it("lasts until the nightly job has written, or the date rolls over", () => {
    // User job at 01:00 UTC, given an hour: values are fresh from 02:00 UTC.
    assert.equal(rollupMaxAgeSeconds(at("2026-03-10T00:30:00Z")), 90 * 60);
    assert.equal(rollupMaxAgeSeconds(at("2026-03-10T01:30:00Z")), 30 * 60);
    assert.equal(rollupMaxAgeSeconds(at("2026-03-10T02:00:00Z")), 22 * 3600); // then UTC midnight comes first
    assert.equal(rollupMaxAgeSeconds(at("2026-03-10T23:00:00Z")), 3600);
    assert.equal(rollupMaxAgeSeconds(at("2026-03-10T00:30:00Z"), { jobMinutes: 10 }), 40 * 60);
    assert.equal(rollupMaxAgeSeconds(at("2026-03-10T00:30:00Z"), { table: "platform" }), 30 * 60);
    assert.throws(() => rollupMaxAgeSeconds(at("2026-03-10T00:30:00Z"), { jobMinutes: 1440 }), RangeError);
  });
});
