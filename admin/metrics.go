package admin

import (
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/vgw-project/vgw/extproc"
	"github.com/vgw-project/vgw/manager"
)

// Metrics are vgw's Prometheus metrics. Counts the request path keeps
// anyway (decisions, queue depth, in flight) and the GPU readings are read
// when Prometheus scrapes, so the request path pays one atomic add per
// decision and nothing more; histograms and lifecycle counters are fed as
// things happen.
type Metrics struct {
	Registry *prometheus.Registry

	mu     sync.Mutex
	models map[string]bool // whose series Models made

	queueWait *prometheus.HistogramVec
	loadTime  *prometheus.HistogramVec
	wakeTime  *prometheus.HistogramVec
	lifecycle *prometheus.CounterVec

	reloadOK   prometheus.Gauge
	reloadTime prometheus.Gauge
	reloads    *prometheus.CounterVec
}

// NewMetrics registers vgw's metrics, and Go's and the process's, in a
// registry of their own. What the admin service reports joins them when
// the service is made with them (Options.Metrics).
func NewMetrics() *Metrics {
	m := &Metrics{
		Registry: prometheus.NewRegistry(),
		models:   map[string]bool{},
		queueWait: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "vgw_queue_wait_seconds",
			Help:    "How long requests waited, for a slot or for their model to load, whatever became of them.",
			Buckets: prometheus.ExponentialBuckets(0.005, 2, 18), // 5 ms to about 11 min
		}, []string{"model"}),
		loadTime: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "vgw_model_load_seconds",
			Help:    "How long loading a model took, from starting its server to its /health answering 200.",
			Buckets: prometheus.ExponentialBuckets(0.1, 2, 14), // 100 ms to about 14 min
		}, []string{"model"}),
		wakeTime: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "vgw_model_wake_seconds",
			Help:    "How long waking a sleeping model took, from the wake's start to its /health answering 200.",
			Buckets: prometheus.ExponentialBuckets(0.05, 2, 12), // 50 ms to about 100 s
		}, []string{"model"}),
		lifecycle: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vgw_model_events_total",
			Help: "Model lifecycle events by kind: " + strings.Join(manager.EventKinds, ", ") + ".",
		}, []string{"model", "kind"}),
		// Named as Prometheus names its own, so the same alert fits:
		// vgw_config_last_reload_successful == 0.
		reloadOK: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "vgw_config_last_reload_successful",
			Help: "1 if the last reload of the config file was applied, 0 if it was refused (the running config stays; vgw's log and the config_refused event say why).",
		}),
		reloadTime: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "vgw_config_last_reload_success_timestamp_seconds",
			Help: "When the config in force was loaded, in Unix seconds.",
		}),
		reloads: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vgw_config_reloads_total",
			Help: "Reloads of the config file, by result: applied or refused.",
		}, []string{"result"}),
	}
	m.reloadOK.Set(1)
	m.reloadTime.Set(float64(time.Now().Unix()))
	m.reloads.WithLabelValues("applied")
	m.reloads.WithLabelValues("refused")
	m.Registry.MustRegister(m.queueWait, m.loadTime, m.wakeTime, m.lifecycle, m.reloadOK, m.reloadTime, m.reloads,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// ConfigReload records a reload of the config file: applied, or refused
// with the running config kept.
func (m *Metrics) ConfigReload(applied bool, at time.Time) {
	if !applied {
		m.reloadOK.Set(0)
		m.reloads.WithLabelValues("refused").Inc()
		return
	}
	m.reloadOK.Set(1)
	m.reloadTime.Set(float64(at.Unix()))
	m.reloads.WithLabelValues("applied").Inc()
}

// Models starts every lifecycle counter of each model at zero, so that an
// alert on, say, increase(vgw_model_events_total{kind="crashed"}[10m])
// sees a series from the start rather than none until the first crash, and
// drops the series of models no longer configured.
func (m *Metrics) Models(names []string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	now := make(map[string]bool, len(names))
	for _, name := range names {
		now[name] = true
		for _, kind := range manager.EventKinds {
			m.lifecycle.WithLabelValues(name, kind)
		}
	}
	for name := range m.models {
		if !now[name] {
			m.lifecycle.DeletePartialMatch(prometheus.Labels{"model": name})
			m.loadTime.DeleteLabelValues(name)
			m.wakeTime.DeleteLabelValues(name)
			m.queueWait.DeleteLabelValues(name)
		}
	}
	m.models = now
}

// QueueWait records a request's wait; give it to extproc.Options.OnWait.
func (m *Metrics) QueueWait(model string, d time.Duration) {
	m.queueWait.WithLabelValues(model).Observe(d.Seconds())
}

// Event counts a lifecycle event, and a load's or a wake's duration.
func (m *Metrics) Event(model, kind string, took time.Duration) {
	if kind == manager.EventProgress {
		return
	}
	m.lifecycle.WithLabelValues(model, kind).Inc()
	switch {
	case took <= 0:
	case kind == manager.EventReady:
		m.loadTime.WithLabelValues(model).Observe(took.Seconds())
	case kind == manager.EventWoken:
		m.wakeTime.WithLabelValues(model).Observe(took.Seconds())
	}
}

// unknownModel labels what was counted for requests that named no
// configured model: not a name a model may have (see
// config.ModelNamePattern), and not empty, which PromQL treats as absent.
const unknownModel = "_unknown"

var (
	descDecisions   = prometheus.NewDesc("vgw_decisions_total", "Requests by model and how admission ended for them: admitted, rejected, timed_out, abandoned (model _unknown: requests that named no configured model).", []string{"model", "outcome"}, nil)
	descQueued      = prometheus.NewDesc("vgw_queued_total", "Times a request had to wait, for a slot or for its model to load, by model.", []string{"model"}, nil)
	descAnswers     = prometheus.NewDesc("vgw_answers_total", "Errors vgw answered itself instead of sending the request on, by model and HTTP status (other: a status not listed).", []string{"model", "status"}, nil)
	descQueue       = prometheus.NewDesc("vgw_queue_depth", "Requests waiting for a slot, by model.", []string{"model"}, nil)
	descBandQueue   = prometheus.NewDesc("vgw_band_queue_depth", "Requests waiting for a slot, by model and priority.", []string{"model", "priority"}, nil)
	descBandReqs    = prometheus.NewDesc("vgw_band_requests_total", "What became of requests as they asked a model for a slot, by model, priority and result: "+flowResults, []string{"model", "priority", "result"}, nil)
	descTenantQueue = prometheus.NewDesc("vgw_tenant_queue_depth", "Requests waiting for a slot, by model and tenant (a configured tenant, or default-flow for every other).", []string{"model", "tenant"}, nil)
	descTenantReqs  = prometheus.NewDesc("vgw_tenant_requests_total", "What became of requests as they asked a model for a slot, by model, tenant (a configured tenant, or default-flow for every other) and result: "+flowResults, []string{"model", "tenant", "result"}, nil)
	descInFlight    = prometheus.NewDesc("vgw_requests_in_flight", "Requests holding a slot (sent on, or waiting for their model to load), by model.", []string{"model"}, nil)
	descLimit       = prometheus.NewDesc("vgw_model_max_concurrent", "The model's limit on requests in flight.", []string{"model"}, nil)
	descState       = prometheus.NewDesc("vgw_model_state", "1 for the state each model is in: "+strings.Join(manager.StateNames(), ", ")+".", []string{"model", "state"}, nil)
	descHostUsed    = prometheus.NewDesc("vgw_host_memory_used_bytes", "Host memory sleeping models hold.", nil, nil)
	descHostLimit   = prometheus.NewDesc("vgw_host_memory_budget_bytes", "Host memory sleeping models may hold (host_memory).", nil, nil)
	descGPUInfo     = prometheus.NewDesc("vgw_gpu_info", "1 for each GPU, with its name and UUID.", []string{"gpu", "name", "uuid"}, nil)
	descGPUUsed     = prometheus.NewDesc("vgw_gpu_memory_used_bytes", "GPU memory in use at the latest reading.", []string{"gpu"}, nil)
	descGPUTotal    = prometheus.NewDesc("vgw_gpu_memory_total_bytes", "GPU memory in all.", []string{"gpu"}, nil)
	descPushes      = prometheus.NewDesc("vgw_xds_pushes_total", "xDS snapshots published.", nil, nil)
	descACKs        = prometheus.NewDesc("vgw_xds_acks_total", "xDS responses Envoys acknowledged.", nil, nil)
	descNACKs       = prometheus.NewDesc("vgw_xds_nacks_total", "xDS responses Envoys rejected.", nil, nil)
	descEnvoys      = prometheus.NewDesc("vgw_xds_connected_envoys", "Envoys connected to xDS.", nil, nil)
	descDraining    = prometheus.NewDesc("vgw_draining", "1 while vgw admits no new requests.", nil, nil)
	descSilent      = prometheus.NewDesc("vgw_xds_silent_streams", "xDS streams that have left a version unanswered for longer than envoy.xds_ack_timeout; requests of unknown Envoys do not wait for them.", nil, nil)
	descIdleEnded   = prometheus.NewDesc("vgw_extproc_idle_streams_ended_total", "ext_proc streams vgw ended because Envoy sent nothing on them for longer than envoy.stream_idle_timeout + 1m before their response began: no real Envoy's.", nil, nil)
)

// flowResults says what the results of the band and tenant request
// counts are.
const flowResults = "admitted (given a slot, at once or after waiting), displaced (taken out of the full queue for a later request of a higher priority or of a tenant further under its share: 429), rejected (429 as it came: the queue or the tenant's share of it was full, or the tenant's budget spent)."

// collector reads what the request path, the manager and xDS keep, at
// scrape time.
type collector struct{ svc *Service }

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descDecisions, descQueued, descAnswers, descQueue, descBandQueue, descBandReqs, descTenantQueue, descTenantReqs, descInFlight, descLimit, descState,
		descGPUInfo, descGPUUsed, descGPUTotal, descHostUsed, descHostLimit, descPushes, descACKs, descNACKs, descEnvoys, descDraining, descSilent, descIdleEnded} {
		ch <- d
	}
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	d := c.svc.d
	for model, counts := range d.Admission.Counts() {
		if model == "" {
			model = unknownModel
		}
		for o, n := range counts.Outcomes {
			if o == extproc.OutcomeQueued {
				ch <- prometheus.MustNewConstMetric(descQueued, prometheus.CounterValue, float64(n), model)
				continue
			}
			ch <- prometheus.MustNewConstMetric(descDecisions, prometheus.CounterValue, float64(n), model, o.String())
		}
		for st, n := range counts.Statuses {
			status := "other"
			if st != 0 {
				status = strconv.Itoa(st)
			}
			ch <- prometheus.MustNewConstMetric(descAnswers, prometheus.CounterValue, float64(n), model, status)
		}
	}
	for model, g := range d.Admission.AllStats() {
		ch <- prometheus.MustNewConstMetric(descQueue, prometheus.GaugeValue, float64(g.Queued), model)
		ch <- prometheus.MustNewConstMetric(descInFlight, prometheus.GaugeValue, float64(g.InFlight), model)
		ch <- prometheus.MustNewConstMetric(descLimit, prometheus.GaugeValue, float64(g.Limits.MaxConcurrent), model)
		flowMetrics(ch, model, g.Bands, g.GonePriorities)
	}
	v := d.Manager.View()
	for _, m := range v.Models {
		for _, s := range manager.StateNames() {
			v := 0.0
			if m.State.String() == s {
				v = 1
			}
			ch <- prometheus.MustNewConstMetric(descState, prometheus.GaugeValue, v, m.Name, s)
		}
	}
	for _, g := range v.GPUs {
		i := strconv.Itoa(g.Index)
		ch <- prometheus.MustNewConstMetric(descGPUInfo, prometheus.GaugeValue, 1, i, g.Name, g.UUID)
		ch <- prometheus.MustNewConstMetric(descGPUUsed, prometheus.GaugeValue, float64(g.Used), i)
		ch <- prometheus.MustNewConstMetric(descGPUTotal, prometheus.GaugeValue, float64(g.Total), i)
	}
	ch <- prometheus.MustNewConstMetric(descHostUsed, prometheus.GaugeValue, float64(v.HostUsed))
	ch <- prometheus.MustNewConstMetric(descHostLimit, prometheus.GaugeValue, float64(v.HostBudget))
	x := d.Envoys.Counters()
	ch <- prometheus.MustNewConstMetric(descPushes, prometheus.CounterValue, float64(x.Pushes))
	ch <- prometheus.MustNewConstMetric(descACKs, prometheus.CounterValue, float64(x.ACKs))
	ch <- prometheus.MustNewConstMetric(descNACKs, prometheus.CounterValue, float64(x.NACKs))
	nodes, _ := d.Envoys.Status()
	ch <- prometheus.MustNewConstMetric(descEnvoys, prometheus.GaugeValue, float64(len(nodes)))
	silent := 0
	for _, n := range nodes {
		silent += n.Silent
	}
	ch <- prometheus.MustNewConstMetric(descSilent, prometheus.GaugeValue, float64(silent))
	ch <- prometheus.MustNewConstMetric(descIdleEnded, prometheus.CounterValue, float64(d.Admission.IdleClosed()))
	draining := 0.0
	if d.Admission.Draining() {
		draining = 1
	}
	ch <- prometheus.MustNewConstMetric(descDraining, prometheus.GaugeValue, draining)
}

// flowMetrics sends a model's queue and counts by priority and by
// tenant: two families rather than one by both, so that the series grow
// with priorities plus tenants, not their product. The counts of flows a
// reload took away stay in their priority's and their tenant's sums.
func flowMetrics(ch chan<- prometheus.Metric, model string, bands []extproc.BandStats, gonePriorities []extproc.FlowStats) {
	type sums struct {
		queued                        int
		admitted, displaced, rejected uint64
	}
	add := func(s *sums, f extproc.FlowStats) {
		s.queued += f.Queued
		s.admitted += f.Admitted
		s.displaced += f.Displaced
		s.rejected += f.Rejected
	}
	emit := func(queue, reqs *prometheus.Desc, label string, s sums) {
		ch <- prometheus.MustNewConstMetric(queue, prometheus.GaugeValue, float64(s.queued), model, label)
		ch <- prometheus.MustNewConstMetric(reqs, prometheus.CounterValue, float64(s.admitted), model, label, "admitted")
		ch <- prometheus.MustNewConstMetric(reqs, prometheus.CounterValue, float64(s.displaced), model, label, "displaced")
		ch <- prometheus.MustNewConstMetric(reqs, prometheus.CounterValue, float64(s.rejected), model, label, "rejected")
	}
	tenants := map[string]*sums{}
	for _, f := range gonePriorities {
		tenants[f.Tenant] = &sums{}
		add(tenants[f.Tenant], f)
	}
	for _, b := range bands {
		var band sums
		add(&band, b.GoneTenants)
		for _, f := range b.Tenants {
			add(&band, f)
			t := tenants[f.Tenant]
			if t == nil {
				t = &sums{}
				tenants[f.Tenant] = t
			}
			add(t, f)
		}
		emit(descBandQueue, descBandReqs, strconv.Itoa(b.Priority), band)
	}
	for name, t := range tenants {
		emit(descTenantQueue, descTenantReqs, name, *t)
	}
}
