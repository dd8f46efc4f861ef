/* The files attached to the message being typed: each with its name, size
 * and an upload progress bar, then "ready" (or why it failed), and a button
 * that removes it (stopping the upload if it still runs). */
(function (ChatApp, Backbone, _) {
  'use strict';

  var UploadItemView = Backbone.View.extend({
    tagName: 'li',
    template: ChatApp.template('upload-template'),

    events: {
      'click [data-action="remove-upload"]': 'dismiss'
    },

    initialize: function () {
      this.listenTo(this.model, 'change:state change:error change:name', this.render);
      this.listenTo(this.model, 'change:loaded', this.progress);
    },

    render: function () {
      var data = this.model.view();
      this.el.className = 'upload upload-' + data.state;
      this.$el.html(this.template(data));
      return this;
    },

    // Only the bar moves: a progress event must not rebuild the item.
    progress: function () {
      var percent = this.model.percent();
      var bar = this.$('.progress');
      bar.attr('aria-valuenow', percent);
      bar.find('.progress-bar').css('width', percent + '%');
      this.$('.upload-percent').text(percent + '%');
    },

    dismiss: function () {
      this.model.dispose();
      if (this.model.collection) {
        this.model.collection.remove(this.model);
      }
    }
  });

  ChatApp.views.UploadTrayView = Backbone.View.extend({
    initialize: function () {
      this.items = {};
      this.listenTo(this.collection, 'add', this.added);
      this.listenTo(this.collection, 'remove', this.removed);
      this.listenTo(this.collection, 'reset', this.render);
    },

    render: function () {
      _.invoke(_.values(this.items), 'remove');
      this.items = {};
      this.collection.each(function (model) { this.added(model); }, this);
      this.el.classList.toggle('d-none', this.collection.length === 0);
      return this;
    },

    added: function (model) {
      var view = this.items[model.cid] = new UploadItemView({ model: model }).render();
      this.el.appendChild(view.el);
      this.el.classList.remove('d-none');
    },

    removed: function (model) {
      var view = this.items[model.cid];
      if (view) {
        view.remove();
        delete this.items[model.cid];
      }
      this.el.classList.toggle('d-none', this.collection.length === 0);
    },

    remove: function () {
      // The uploads go on without the view (another conversation is shown).
      _.invoke(_.values(this.items), 'remove');
      this.items = {};
      this.stopListening();
      this.undelegateEvents();
      return this;
    }
  });
})(ChatApp, Backbone, _);
