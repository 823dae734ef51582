// Package admintest reads vgw's HTTP pages in tests: the Prometheus text
// that /metrics serves, as a flat map a test can assert on, and the pages
// behind the admin token.
package admintest

import (
	"bytes"
	"fmt"
	"io"
	"net/http"
	"sort"
	"strings"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// Samples are the values of a scrape, keyed by series as Prometheus
// writes them: name{label="value",...} with labels sorted by name.
// Histograms give NAME_count and NAME_sum; a counter or gauge its value.
type Samples map[string]float64

// Parse reads Prometheus text exposition format with Prometheus's own
// parser, so what it accepts a Prometheus server accepts.
func Parse(r io.Reader) (Samples, error) {
	// Legacy validation: names a Prometheus of any version accepts.
	p := expfmt.NewTextParser(model.LegacyValidation)
	families, err := p.TextToMetricFamilies(r)
	if err != nil {
		return nil, fmt.Errorf("parse Prometheus text: %w", err)
	}
	out := Samples{}
	for name, f := range families {
		for _, m := range f.GetMetric() {
			labels := series(m.GetLabel())
			switch f.GetType() {
			case dto.MetricType_COUNTER:
				out[name+labels] = m.GetCounter().GetValue()
			case dto.MetricType_GAUGE:
				out[name+labels] = m.GetGauge().GetValue()
			case dto.MetricType_HISTOGRAM:
				out[name+"_count"+labels] = float64(m.GetHistogram().GetSampleCount())
				out[name+"_sum"+labels] = m.GetHistogram().GetSampleSum()
			case dto.MetricType_UNTYPED:
				out[name+labels] = m.GetUntyped().GetValue()
			}
		}
	}
	return out, nil
}

// Scrape fetches and parses url.
func Scrape(url string) (Samples, error) {
	code, body, err := Get(url, "")
	if err != nil {
		return nil, fmt.Errorf("scrape: %w", err)
	}
	if code != http.StatusOK {
		return nil, fmt.Errorf("scrape %s: status %d", url, code)
	}
	return Parse(bytes.NewReader(body))
}

// Get fetches url, with "Authorization: Bearer token" unless token is "",
// and returns the status and body.
func Get(url, token string) (int, []byte, error) {
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		return 0, nil, err
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, nil, fmt.Errorf("GET %s: %w", url, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, nil, fmt.Errorf("GET %s: %w", url, err)
	}
	return resp.StatusCode, body, nil
}

func series(labels []*dto.LabelPair) string {
	if len(labels) == 0 {
		return ""
	}
	parts := make([]string, len(labels))
	for i, l := range labels {
		parts[i] = fmt.Sprintf("%s=%q", l.GetName(), l.GetValue())
	}
	sort.Strings(parts)
	return "{" + strings.Join(parts, ",") + "}"
}
